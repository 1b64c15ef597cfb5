"""
Reading ``tap.cfg``: every mistake an operator can make is one line naming the
file, the ``[section]``, the key and the reason; a good file gives immutable
settings with the documented defaults.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from twisted_gateway.config import (
    ConfigError,
    DemoSettings,
    GatewaySettings,
    RouteSettings,
    Settings,
    config_warnings,
    describe_settings,
    load_config,
    load_settings,
    parse_config,
    with_listen,
)
from twisted_gateway.sockets import TCPKeepalive

REPO = Path(__file__).resolve().parent.parent

ROUTE = """
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:9001
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.cfg"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _assert_one_line(
    error: ConfigError, path: str, section: str | None, key: str | None, reason: str
) -> None:
    """The message is one line: ``path: [section] key: reason``."""
    message = str(error)
    assert "\n" not in message and "\r" not in message
    where = path
    if section is not None:
        where += f": [{section}]"
    if key is not None:
        where += f" {key}"
    assert message.startswith(where + ": "), message
    assert reason in message[len(where) + 2 :], message


#: (case, config text, section, key, a fragment of the reason)
HS_AUTH = "[auth]\nalgorithms = HS256\nsecret = 0123456789abcdef0123456789abcdef\naudience = chat\n"

BAD_CONFIGS = [
    ("unknown section", "[gatway]\nlisten = tcp:8080\n" + ROUTE, "gatway", None, "unknown section"),
    ("section named route: without a name", "[route:]\nprefix = /x\nupstream = http://h\n" + ROUTE,
     "route:", None, "unknown section"),
    ("DEFAULT is not special", "[DEFAULT]\nlisten = tcp:8080\n" + ROUTE, "DEFAULT", None, "unknown section"),
    ("unknown gateway key", "[gateway]\nlistn = tcp:8080\n" + ROUTE, "gateway", "listn", "unknown key"),
    ("unknown route key", ROUTE + "upstreams = http://h\n", "route:chat", "upstreams", "unknown key"),
    ("unknown demo key", "[demo]\nchat = tcp:9001\n" + ROUTE, "demo", "chat", "unknown key"),
    ("number that is not a number", "[gateway]\nconnect_timeout = soon\n" + ROUTE,
     "gateway", "connect_timeout", "'soon'"),
    ("negative timeout", "[gateway]\nws_open_timeout = -1\n" + ROUTE,
     "gateway", "ws_open_timeout", "positive"),
    ("zero timeout", "[gateway]\nrequest_timeout = 0\n" + ROUTE, "gateway", "request_timeout", "positive"),
    ("infinite timeout", "[gateway]\nconnect_timeout = inf\n" + ROUTE, "gateway", "connect_timeout", "'inf'"),
    ("NaN timeout", "[gateway]\nconnect_timeout = nan\n" + ROUTE, "gateway", "connect_timeout", "'nan'"),
    ("fractional size", "[gateway]\nws_max_message_size = 1.5\n" + ROUTE,
     "gateway", "ws_max_message_size", "whole number"),
    ("zero size", "[gateway]\nmax_body_size = 0\n" + ROUTE, "gateway", "max_body_size", "> 0"),
    ("zero keep-alive", "[gateway]\nupstream_keepalive = 0\n" + ROUTE, "gateway", "upstream_keepalive", "> 0"),
    ("negative drain delay", "[gateway]\ndrain_delay = -2\n" + ROUTE, "gateway", "drain_delay", "'-2'"),
    ("value spread over two lines", "[gateway]\nconnect_timeout = 5\n  seconds\n" + ROUTE,
     "gateway", "connect_timeout", "number"),
    ("bad bool in a route", ROUTE + "websocket = maybe\n", "route:chat", "websocket", "true or false"),
    ("bad bool in gateway", "[gateway]\nws_compression = 2\n" + ROUTE, "gateway", "ws_compression", "'2'"),
    ("bad URL scheme", "[route:chat]\nprefix = /v1/chat\nupstream = ftp://127.0.0.1:9001\n",
     "route:chat", "upstream", "http:// or https://"),
    ("ws:// is not an upstream base URL", "[route:chat]\nprefix = /v1/chat\nupstream = ws://h:9001\n",
     "route:chat", "upstream", "http:// or https://"),
    ("URL without a scheme", "[route:chat]\nprefix = /v1/chat\nupstream = 127.0.0.1:9001\n",
     "route:chat", "upstream", "http:// or https://"),
    ("URL without a host", "[route:chat]\nprefix = /v1/chat\nupstream = http:///chat\n",
     "route:chat", "upstream", "no host"),
    ("URL with a bad port", "[route:chat]\nprefix = /v1/chat\nupstream = http://h:99999\n",
     "route:chat", "upstream", "bad port"),
    ("URL with a query", "[route:chat]\nprefix = /v1/chat\nupstream = http://h/?a=1\n",
     "route:chat", "upstream", "query"),
    ("second URL bad", "[route:chat]\nprefix = /v1/chat\nupstream = http://a https:/b\n",
     "route:chat", "upstream", "'https:/b'"),
    ("missing prefix", "[route:chat]\nupstream = http://h\n", "route:chat", "prefix", "missing required key"),
    ("empty prefix", "[route:chat]\nprefix =\nupstream = http://h\n", "route:chat", "prefix",
     "missing required key"),
    ("missing upstream", "[route:chat]\nprefix = /v1/chat\n", "route:chat", "upstream", "missing required key"),
    ("prefix without a leading slash", "[route:chat]\nprefix = v1/chat\nupstream = http://h\n",
     "route:chat", "prefix", "must start with '/'"),
    ("prefix with dot segments", "[route:chat]\nprefix = /v1/../admin\nupstream = http://h\n",
     "route:chat", "prefix", "normalised"),
    ("prefix with a query", "[route:chat]\nprefix = /v1?x=1\nupstream = http://h\n",
     "route:chat", "prefix", "query"),
    ("duplicate prefix", ROUTE + "[route:chat2]\nprefix = /v1/chat\nupstream = http://h\n",
     "route:chat2", "prefix", "[route:chat]"),
    ("duplicate prefix spelt with a trailing slash",
     ROUTE + "[route:chat2]\nprefix = /v1/chat/\nupstream = http://h\n",
     "route:chat2", "prefix", "[route:chat]"),
    ("bad endpoint type", "[gateway]\nlisten = tpc:8080\n" + ROUTE, "gateway", "listen", "'tpc:8080'"),
    ("second endpoint of several bad", "[gateway]\nlisten = tcp:8080 htp:8081\n" + ROUTE,
     "gateway", "listen", "'htp:8081'"),
    ("bad demo endpoint type", "[demo]\nchat_service = localhost:9001\n" + ROUTE,
     "demo", "chat_service", "'localhost:9001'"),
    ("bad CIDR", "[gateway]\ntrusted_proxies = 10.0.0.0/33\n" + ROUTE,
     "gateway", "trusted_proxies", "'10.0.0.0/33'"),
    ("key given twice", "[gateway]\nlisten = tcp:1\nlisten = tcp:2\n" + ROUTE, "gateway", "listen", "twice"),
    ("section given twice", "[gateway]\n[gateway]\n" + ROUTE, "gateway", None, "twice"),
    ("bad escaped_slashes", ROUTE + "escaped_slashes = decode\n", "route:chat", "escaped_slashes",
     "keep, reject"),
    ("bad host_header", ROUTE + "host_header = http://chat.example.com\n", "route:chat", "host_header",
     "client, upstream or a host"),
    ("bad route request_timeout", ROUTE + "request_timeout = 0\n", "route:chat", "request_timeout", "positive number"),
    ("cluster without redis", "[cluster]\nnode_id = a\n" + ROUTE, "cluster", "redis", "missing required key"),
    ("cluster redis not a redis URL", "[cluster]\nredis = http://h:6379\n" + ROUTE, "cluster", "redis",
     "redis:// or rediss://"),
    ("cluster redis with a bad database", "[cluster]\nredis = redis://h:6379/x\n" + ROUTE, "cluster", "redis",
     "must be a number"),
    ("cluster redis from an unset variable", "[cluster]\nredis = env:NO_SUCH_VARIABLE_19\n" + ROUTE,
     "cluster", "redis", "NO_SUCH_VARIABLE_19 is not set"),
    ("cluster policy", "[cluster]\nredis = redis://h\non_redis_down = maybe\n" + ROUTE, "cluster",
     "on_redis_down", "open or closed"),
    ("unknown cluster key", "[cluster]\nredis = redis://h\nnode = a\n" + ROUTE, "cluster", "node", "unknown key"),
    ("cluster ca_file without TLS", "[cluster]\nredis = redis://h\nca_file = /etc/hostname\n" + ROUTE, "cluster",
     "ca_file", "only used with a rediss:// URL"),
    ("cluster ca_file missing", "[cluster]\nredis = rediss://h\nca_file = /no/such/ca.pem\n" + ROUTE, "cluster",
     "ca_file", "/no/such/ca.pem"),
    ("cluster ca_file not PEM", "[cluster]\nredis = rediss://h\nca_file = /etc/hostname\n" + ROUTE, "cluster",
     "ca_file", "holds no PEM certificate"),
    ("cluster client_key without client_cert", "[cluster]\nredis = rediss://h\nclient_key = /etc/hostname\n" + ROUTE,
     "cluster", "client_key", "needs client_cert"),
    ("cluster client_cert without TLS", "[cluster]\nredis = redis://h\nclient_cert = /etc/hostname\n" + ROUTE,
     "cluster", "client_cert", "only used with a rediss:// URL"),
    ("cluster client_cert not PEM", "[cluster]\nredis = rediss://h\nclient_cert = /etc/hostname\n" + ROUTE,
     "cluster", "client_cert", "holds no PEM certificate"),
    ("short admin token", "[admin]\nlisten = tcp:0\ntoken = short\n" + ROUTE, "admin", "token", "at least 16"),
    ("negative per-user cap", ROUTE + "max_websockets_per_user = -1\n", "route:chat", "max_websockets_per_user",
     "-1"),
    ("negative ws_rate_limit", "[gateway]\nws_rate_limit = -1\n" + ROUTE, "gateway", "ws_rate_limit", "-1"),
    ("fractional ws_rate_burst", ROUTE + "ws_rate_burst = 2.5\n", "route:chat", "ws_rate_burst", "2.5"),
    ("negative ws_max_age", "[gateway]\nws_max_age = -1\n" + ROUTE, "gateway", "ws_max_age", "-1"),
    ("ws_max_age not a number", ROUTE + "ws_max_age = 1h\n", "route:chat", "ws_max_age", "1h"),
    ("workers = 0", "[gateway]\nworkers = 0\n" + ROUTE, "gateway", "workers", "auto or a whole number > 0"),
    ("negative workers", "[gateway]\nworkers = -2\n" + ROUTE, "gateway", "workers", "'-2'"),
    ("workers not a number", "[gateway]\nworkers = many\n" + ROUTE, "gateway", "workers", "'many'"),
    ("bad header name to strip", "[gateway]\nstrip_request_headers = X-Real-IP X:Y\n" + ROUTE,
     "gateway", "strip_request_headers", "'x:y'"),
    ("bad require_claim", HS_AUTH + ROUTE + "require_claim = admin\n", "route:chat", "require_claim",
     "expected NAME:VALUE"),
    ("require_scope on an optional route", HS_AUTH + ROUTE + "auth = optional\nrequire_scope = a\n",
     "route:chat", "require_scope", "needs auth = required"),
    ("bad claims_header", HS_AUTH + ROUTE + "claims_header = ,\n", "route:chat", "claims_header",
     "full, none or claim names"),
    ("bad max_token_size", HS_AUTH.replace("[auth]\n", "[auth]\nmax_token_size = 0\n") + ROUTE,
     "auth", "max_token_size", "> 0"),
    ("cookie auth on a WebSocket route open to every origin",
     "[auth]\nalgorithms = HS256\nsecret = 0123456789abcdef0123456789abcdef\ncookie = session\n" + ROUTE,
     "route:chat", "allowed_origins", "must list the allowed origins"),
]

#: Endpoint strings of a known type whose arguments Twisted cannot use: start-up
#: must fail with the same one line, not a traceback from ``serverFromString``.
BAD_ENDPOINT_ARGUMENTS = [
    ("port that is not a number", "tcp:notaport"),
    ("unknown endpoint argument", "tcp:8080:interfce=127.0.0.1"),
]


@pytest.mark.parametrize(
    "text, section, key, reason",
    [case[1:] for case in BAD_CONFIGS],
    ids=[case[0] for case in BAD_CONFIGS],
)
def test_a_bad_config_file_is_one_line_naming_file_section_key_and_reason(
    tmp_path, text, section, key, reason
):
    """Each kind of mistake stops start-up with ``file: [section] key: reason``."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    _assert_one_line(error.value, path, section, key, reason)


@pytest.mark.parametrize(
    "endpoint", [case[1] for case in BAD_ENDPOINT_ARGUMENTS], ids=[case[0] for case in BAD_ENDPOINT_ARGUMENTS]
)
def test_an_endpoint_twisted_cannot_parse_is_a_config_error(tmp_path, endpoint):
    """``listen = tcp:notaport`` is reported like any bad value, naming [gateway] listen."""
    path = _write(tmp_path, f"[gateway]\nlisten = {endpoint}\n" + ROUTE)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    _assert_one_line(error.value, path, "gateway", "listen", repr(endpoint))


@pytest.mark.parametrize(
    "make_path, reason",
    [
        (lambda tmp: tmp / "missing.cfg", "No such file or directory"),
        (lambda tmp: tmp, "Is a directory"),
    ],
    ids=["missing file", "directory"],
)
def test_an_unreadable_file_is_one_line_naming_it(tmp_path, make_path, reason):
    """A config path that cannot be read is one line with the path and why."""
    path = str(make_path(tmp_path))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    _assert_one_line(error.value, path, None, None, reason)


def test_a_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    """Latin-1 bytes in the file are reported, not a UnicodeDecodeError traceback."""
    path = tmp_path / "latin1.cfg"
    path.write_bytes(b"; caf\xe9\n" + ROUTE.encode())
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    _assert_one_line(error.value, str(path), None, None, "UTF-8")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("listen = tcp:8080\n" + ROUTE, "no section headers"),
        ("[gateway]\nlisten = tcp:8080\n", "no [route:NAME] section"),
        ("", "no [route:NAME] section"),
    ],
    ids=["key before any section", "no route", "empty file"],
)
def test_a_file_without_routes_or_sections_is_one_line(tmp_path, text, reason):
    """A file that is not a gateway config at all still gets one line with the path."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(path + ": ")
    assert reason in message


def test_config_error_is_a_usage_error():
    """twistd reports a ConfigError as an option problem, not a crash."""
    from twisted.python import usage

    assert issubclass(ConfigError, usage.UsageError)


# -- a good file ---------------------------------------------------------------


def test_only_a_route_gives_every_documented_default():
    """A file with one route runs with the defaults the README lists."""
    settings = parse_config(ROUTE, source="minimal.cfg")
    assert settings.source == "minimal.cfg"
    assert settings.gateway == GatewaySettings(
        listen=("tcp:8080",),
        connect_timeout=5.0,
        ws_open_timeout=10.0,
        ws_max_message_size=16 * 1024 * 1024,
        ws_compression=True,
        request_timeout=30.0,
        max_body_size=10 * 1024 * 1024,
        upstream_keepalive=32,
        trusted_proxies=(),
    )
    assert settings.routes == (
        RouteSettings(
            name="chat",
            prefix="/v1/chat",
            upstream=("http://127.0.0.1:9001",),
            websocket=True,
            ws_compression=None,
        ),
    )
    assert settings.demo == DemoSettings(chat_service=None)


def test_an_empty_value_means_the_default():
    """``connect_timeout =`` with nothing after it keeps the default."""
    settings = parse_config("[gateway]\nconnect_timeout =\n" + ROUTE)
    assert settings.gateway.connect_timeout == 5.0


def test_every_key_is_read():
    """Every documented key reaches the settings, comments and underscores allowed."""
    settings = parse_config(
        """
        [gateway]
        listen = tcp:8080:interface=127.0.0.1
            unix:/run/gateway.sock
        connect_timeout = 2.5 ; seconds
        ws_open_timeout = 7
        ws_max_message_size = 1_048_576
        ws_compression = off
        request_timeout = 12
        max_body_size = 2048
        upstream_keepalive = 4
        trusted_proxies = 10.0.0.0/8 ::1 192.168.1.7

        [route:chat]
        prefix = /v1/chat/
        upstream = http://a:9001/ https://b.example/base
        websocket = no
        ws_compression = yes

        [route:root]
        prefix = /
        upstream = http://c

        [demo]
        chat_service = tcp:9001:interface=127.0.0.1
        """.replace("\n        ", "\n")
    )
    gateway = settings.gateway
    assert gateway.listen == ("tcp:8080:interface=127.0.0.1", "unix:/run/gateway.sock")
    assert gateway.connect_timeout == 2.5
    assert gateway.ws_open_timeout == 7.0
    assert gateway.ws_max_message_size == 1_048_576
    assert gateway.ws_compression is False
    assert gateway.request_timeout == 12.0
    assert gateway.max_body_size == 2048
    assert gateway.upstream_keepalive == 4
    assert gateway.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.1.7/32"),
    )
    chat, root = settings.routes
    assert chat == RouteSettings(
        name="chat",
        prefix="/v1/chat",
        upstream=("http://a:9001", "https://b.example/base"),
        websocket=False,
        ws_compression=True,
    )
    assert (root.name, root.prefix, root.upstream) == ("root", "/", ("http://c",))
    assert settings.demo.chat_service == "tcp:9001:interface=127.0.0.1"


@pytest.mark.parametrize(
    "text, expected",
    [(t, True) for t in ("true", "True", "YES", "on", "1", " yes ")]
    + [(t, False) for t in ("false", "FALSE", "no", "Off", "0")],
)
def test_booleans_accept_the_usual_spellings(text, expected):
    """true/yes/on/1 and false/no/off/0, in any case."""
    settings = parse_config(ROUTE + f"websocket = {text}\n")
    assert settings.routes[0].websocket is expected


def test_the_bundled_tap_cfg_is_valid():
    """``make run``'s config loads: the demo route and the demo chat-service."""
    settings = load_config(str(REPO / "tap.cfg"))
    assert settings.gateway.listen == ("tcp:8080",)
    assert [(r.name, r.prefix) for r in settings.routes] == [("chat", "/v1/chat")]
    assert settings.demo.chat_service == "tcp:9001:interface=127.0.0.1"


@pytest.mark.parametrize("text, expected", [("", 1), ("workers = 4", 4), ("workers = auto", "auto")])
def test_workers_is_a_number_or_auto(text, expected):
    """``[gateway] workers``: one process by default, a count, or one per CPU."""
    assert parse_config(f"[gateway]\n{text}\n" + ROUTE).gateway.workers == expected


def test_settings_are_immutable():
    """Nothing can change the settings after start-up."""
    settings = parse_config(ROUTE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.gateway.connect_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.routes[0].prefix = "/"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.routes = ()  # type: ignore[misc]


def test_settings_can_be_made_in_code():
    """A library user builds settings without a file; the defaults match the file's."""
    route = RouteSettings(name="chat", prefix="/v1/chat", upstream=("http://h",))
    assert Settings(routes=(route,)).gateway == parse_config(ROUTE).gateway


# -- --listen ----------------------------------------------------------------------


def test_with_listen_replaces_the_configured_endpoints():
    """``--listen`` endpoints replace ``[gateway] listen``; everything else is kept."""
    settings = parse_config("[gateway]\nlisten = tcp:8080\nconnect_timeout = 3\n" + ROUTE)
    replaced = with_listen(settings, ["tcp:0:interface=127.0.0.1", "tcp6:9090"])
    assert replaced.gateway.listen == ("tcp:0:interface=127.0.0.1", "tcp6:9090")
    assert replaced.gateway.connect_timeout == 3.0
    assert replaced.routes == settings.routes
    assert settings.gateway.listen == ("tcp:8080",)


@pytest.mark.parametrize("listen", [["foo:8080"], ["tcp:0", "htp:1"]], ids=["only", "second"])
def test_with_listen_refuses_an_unknown_endpoint_type_in_one_line(listen):
    """A bad ``--listen`` names the option and the endpoint."""
    with pytest.raises(ConfigError) as error:
        with_listen(parse_config(ROUTE), listen)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("--listen: ")
    assert repr(listen[-1]) in message


def test_with_listen_refuses_an_endpoint_twisted_cannot_parse():
    """``--listen tcp:notaport`` is one line naming the option, not a traceback later."""
    with pytest.raises(ConfigError) as error:
        with_listen(parse_config(ROUTE), ["tcp:notaport"])
    assert str(error.value).startswith("--listen: ")
    assert "'tcp:notaport'" in str(error.value)


# -- hygiene keys ----------------------------------------------------------------


def test_hygiene_keys_default_to_the_safe_choice():
    """Underscore names dropped, escaped slashes checked, address/routing headers stripped."""
    settings = parse_config(ROUTE)
    route = settings.routes[0]
    assert route.underscores_in_headers is False
    assert route.escaped_slashes == "check"
    assert settings.gateway.strip_request_headers == (
        "x-real-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "x-original-url",
        "x-rewrite-url",
    )


def test_hygiene_keys_are_read():
    settings = parse_config(
        "[gateway]\nstrip_request_headers = X-Real-IP X-Client-Id\n"
        + ROUTE
        + "underscores_in_headers = on\nescaped_slashes = keep\n"
    )
    assert settings.gateway.strip_request_headers == ("x-real-ip", "x-client-id")
    assert settings.routes[0].underscores_in_headers is True
    assert settings.routes[0].escaped_slashes == "keep"
    none = parse_config("[gateway]\nstrip_request_headers = none\n" + ROUTE)
    assert none.gateway.strip_request_headers == ()


@pytest.mark.parametrize(
    "route_extra",
    ["allowed_origins = https://app.example\n", "auth = none\n", "websocket = false\n"],
    ids=["origins listed", "no auth", "no websocket"],
)
def test_cookie_auth_starts_when_the_route_cannot_be_opened_cross_site_with_it(route_extra):
    auth = "[auth]\nalgorithms = HS256\nsecret = 0123456789abcdef0123456789abcdef\ncookie = session\n"
    settings = parse_config(auth + ROUTE + route_extra)
    assert settings.routes[0].name == "chat"


# -- the front door's keys -----------------------------------------------------------


@pytest.mark.parametrize(
    "line, field, value",
    [
        ("", "max_client_connections", "auto"),
        ("max_client_connections = auto", "max_client_connections", "auto"),
        ("max_client_connections = AUTO", "max_client_connections", "auto"),
        ("max_client_connections = 10_000", "max_client_connections", 10000),
        ("", "max_open_files", None),
        ("max_open_files = 65536", "max_open_files", 65536),
        ("", "client_header_timeout", 60.0),
        ("client_header_timeout = 2.5", "client_header_timeout", 2.5),
        ("", "client_body_timeout", 60.0),
        ("client_body_timeout = 10", "client_body_timeout", 10.0),
        ("", "keepalive_timeout", 75.0),
        ("keepalive_timeout = 5", "keepalive_timeout", 5.0),
    ],
)
def test_the_front_doors_keys_have_nginx_like_defaults(line, field, value):
    settings = parse_config(f"[gateway]\n{line}\n" + ROUTE)
    assert getattr(settings.gateway, field) == value


@pytest.mark.parametrize(
    "line, key, reason",
    [
        ("max_client_connections = 0", "max_client_connections", "expected auto or a whole number > 0"),
        ("max_client_connections = lots", "max_client_connections", "'lots'"),
        ("max_open_files = -1", "max_open_files", "> 0"),
        ("client_header_timeout = 0", "client_header_timeout", "positive"),
        ("keepalive_timeout = soon", "keepalive_timeout", "'soon'"),
    ],
)
def test_a_bad_front_door_key_is_one_line_naming_it(line, key, reason):
    with pytest.raises(ConfigError) as error:
        parse_config(f"[gateway]\n{line}\n" + ROUTE)
    assert error.value.key == key and reason in str(error.value)


def test_check_shows_each_listeners_effective_backlog():
    """``--check`` says what backlog each listener gets (the system's maximum unless set)."""
    from twisted_gateway.tls import system_listen_backlog

    settings = parse_config("[gateway]\nlisten = tcp:8080 tcp:8081:backlog=100\n" + ROUTE)
    text = describe_settings(settings)
    assert f"; tcp:8080: listen backlog {system_listen_backlog()}\n" in text
    assert "; tcp:8081:backlog=100: listen backlog 100\n" in text
    assert "max_client_connections = auto\n" in text


# -- dead and slow peers -------------------------------------------------------


@pytest.mark.parametrize(
    "line, value",
    [
        ("", TCPKeepalive(60, 10, 6)),
        ("tcp_keepalive = 2 1 3", TCPKeepalive(2, 1, 3)),
        ("tcp_keepalive = off", None),
        ("tcp_keepalive = OFF", None),
    ],
)
def test_tcp_keepalive_is_on_by_default_and_may_be_turned_off(line, value):
    settings = parse_config(f"[gateway]\n{line}\n" + ROUTE)
    assert settings.gateway.tcp_keepalive == value


@pytest.mark.parametrize("text", ["60 10", "60 10 6 1", "60 0 6", "a b c", "on", "-1 10 6"])
def test_a_bad_tcp_keepalive_is_one_line_naming_it(text):
    with pytest.raises(ConfigError) as error:
        parse_config(f"[gateway]\ntcp_keepalive = {text}\n" + ROUTE)
    assert error.value.key == "tcp_keepalive"
    assert "three whole numbers > 0 (idle interval count)" in str(error.value)


@pytest.mark.parametrize("line, shown", [("", "60 10 6"), ("tcp_keepalive = off", "off")])
def test_check_shows_tcp_keepalive_as_written(line, shown):
    text = describe_settings(parse_config(f"[gateway]\n{line}\n" + ROUTE))
    assert f"\ntcp_keepalive = {shown}\n" in text


def test_transparency_keys_default_to_what_a_direct_connection_sees():
    """The client's Host by default; the gateway's request_timeout unless a route sets its own."""
    route = parse_config(ROUTE).routes[0]
    assert (route.host_header, route.request_timeout) == ("client", None)
    route = parse_config(ROUTE + "host_header = Internal.Example:8080\nrequest_timeout = 40\n").routes[0]
    assert (route.host_header, route.request_timeout) == ("internal.example:8080", 40.0)
    assert route.request_buffering is True
    assert parse_config(ROUTE + "request_buffering = off\n").routes[0].request_buffering is False


@pytest.mark.parametrize(
    "lines, warned",
    [
        ("", []),
        ("ws_ping_timeout = 5", []),
        ("ws_ping_interval = 3\nws_ping_timeout = 1", ["[gateway] ws_ping_timeout: 1 s is under 5 s"]),
        ("ws_ping_interval = 0\nws_ping_timeout = 1", []),
        ("ws_ping_interval = 0", []),
        ("tcp_keepalive = off", []),
        ("ws_ping_interval = 0\ntcp_keepalive = off", ["[gateway] ws_ping_interval: 0 with tcp_keepalive = off"]),
    ],
)
def test_risky_ping_and_keepalive_settings_are_warned_about_not_refused(lines, warned):
    settings = parse_config(f"[gateway]\n{lines}\n" + ROUTE, source="gw.cfg")
    warnings = config_warnings(settings)
    assert len(warnings) == len(warned)
    for line, start in zip(warnings, warned):
        assert line.startswith(f"gw.cfg: {start}")


def test_ws_rate_limit_is_off_by_default_and_a_route_may_set_its_own():
    """0 messages a second means no limit; a route's own rate and burst win over the gateway's."""
    settings = parse_config(ROUTE)
    assert (settings.gateway.ws_rate_limit, settings.routes[0].ws_rate_limit) == (0.0, None)
    settings = parse_config("[gateway]\nws_rate_limit = 20\nws_rate_burst = 40\n" + ROUTE + "ws_rate_limit = 5\n")
    assert (settings.gateway.ws_rate_limit, settings.gateway.ws_rate_burst) == (20.0, 40)
    assert (settings.routes[0].ws_rate_limit, settings.routes[0].ws_rate_burst) == (5.0, None)


def test_ws_max_age_is_off_by_default_and_a_route_may_set_its_own():
    settings = parse_config(ROUTE)
    assert (settings.gateway.ws_max_age, settings.routes[0].ws_max_age) == (0.0, None)
    settings = parse_config("[gateway]\nws_max_age = 3600\n" + ROUTE + "ws_max_age = 0\n")
    assert (settings.gateway.ws_max_age, settings.routes[0].ws_max_age) == (3600.0, 0.0)


def test_cluster_section_reads_the_redis_url_from_the_environment_and_never_shows_it(monkeypatch):
    """The Redis URL may carry a password: env:NAME works, and --check masks it like a secret."""
    monkeypatch.setenv("GW_REDIS_URL", "redis://:hunter2@redis.internal:6380/2")
    settings = load_settings(parse_config("[cluster]\nredis = env:GW_REDIS_URL\nnode_id = gw-a\n" + ROUTE))
    assert (settings.cluster.node_id, settings.cluster.on_redis_down) == ("gw-a", "open")
    assert settings.cluster.redis == "redis://:hunter2@redis.internal:6380/2"
    text = describe_settings(settings)
    assert "hunter2" not in text and "redis = (set)" in text


def test_a_cluster_node_without_node_id_is_named_hostname_pid_when_loaded():
    """Parsing leaves the default empty (it depends on the process); loading and --check name it."""
    import os
    import socket

    parsed = parse_config("[cluster]\nredis = redis://127.0.0.1:6379\n" + ROUTE)
    assert parsed.cluster.node_id == ""
    loaded = load_settings(parsed)
    assert loaded.cluster.node_id == f"{socket.gethostname()}-{os.getpid()}"
    assert f"node_id = {socket.gethostname()}-{os.getpid()}" in describe_settings(loaded)


def test_admin_token_off_is_said_by_check_and_a_token_from_the_environment_is_masked(monkeypatch):
    text = describe_settings(parse_config("[admin]\nlisten = tcp:0\n" + ROUTE))
    assert "; [admin] token is not set: the /admin API is not served" in text
    monkeypatch.setenv("GW_ADMIN_TOKEN", "0123456789abcdef-admin")
    settings = load_settings(parse_config("[admin]\nlisten = tcp:0\ntoken = env:GW_ADMIN_TOKEN\n" + ROUTE))
    assert settings.admin.token == b"0123456789abcdef-admin"
    assert "token = (set)" in describe_settings(settings)


def test_identity_provider_keys_are_read():
    """typ, max_token_size and a route's require_scope, require_claim and claims_header."""
    settings = parse_config(
        HS_AUTH + "typ = at+jwt\nmax_token_size = 20000\n" + ROUTE
        + "require_scope = chat:write chat:admin\nrequire_claim = realm_access.roles:admin tenant:a:b\n"
        + "claims_header = sub, email\n"
    )
    assert (settings.auth.typ, settings.auth.max_token_size) == ("at+jwt", 20000)
    route = settings.routes[0]
    assert route.require_scope == ("chat:write", "chat:admin")
    assert route.require_claim == (("realm_access.roles", "admin"), ("tenant", "a:b"))
    assert route.claims_header == ("sub", "email")
    defaults = parse_config(HS_AUTH + ROUTE)
    assert (defaults.auth.typ, defaults.auth.max_token_size) == (None, 16 * 1024)
    assert (defaults.routes[0].require_scope, defaults.routes[0].claims_header) == ((), "full")


@pytest.mark.parametrize(
    "auth, route, warned",
    [
        (HS_AUTH, "", []),
        (HS_AUTH.replace("audience = chat\n", ""), "", ["[auth] audience: not set"]),
        (HS_AUTH.replace("audience = chat\n", ""), "auth = none\n", []),
        ("[auth]\nalgorithms = RS256\naudience = a\njwks_url = http://idp.example.com/jwks\n", "",
         ["[auth] jwks_url: fetched over plain http from idp.example.com"]),
        ("[auth]\nalgorithms = RS256\naudience = a\njwks_url = http://127.0.0.1:8080/jwks\n", "", []),
        ("[auth]\nalgorithms = RS256\naudience = a\njwks_url = http://localhost/jwks\n", "", []),
    ],
)
def test_risky_auth_settings_are_warned_about(auth, route, warned):
    """No audience on a route that authenticates, a JWKS over plain http: a warning each."""
    warnings = config_warnings(parse_config(auth + ROUTE + route, source="gw.cfg"))
    assert len(warnings) == len(warned), warnings
    for line, start in zip(warnings, warned):
        assert line.startswith(f"gw.cfg: {start}")
