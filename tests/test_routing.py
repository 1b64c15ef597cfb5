"""
Path normalisation and prefix routing as tables: the path that is routed is
the path the upstream receives, and no spelling of ``..`` climbs above ``/``.
"""

from __future__ import annotations

import pytest

from twisted_gateway.errors import GatewayError
from twisted_gateway.routing import (
    BadPath,
    RouteTable,
    check_escaped_path,
    decoded_path,
    normalize_path,
    prefix_matches,
    query_fields,
    query_value,
    split_uri,
    upstream_url,
    validate_prefix,
)

# -- split_uri -------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, path, query",
    [
        (b"/", b"/", b""),
        (b"/v1/chat/ws", b"/v1/chat/ws", b""),
        (b"/v1/chat/ws?room=a&token=t", b"/v1/chat/ws", b"room=a&token=t"),
        (b"/a?", b"/a", b""),
        (b"/a?b=c?d", b"/a", b"b=c?d"),
        (b"/a?next=/b/../c", b"/a", b"next=/b/../c"),
        (b"/a#frag", b"/a", b""),
        (b"/a%3Fb?c", b"/a%3Fb", b"c"),
        (b"http://example.com/v1/chat?x=1", b"/v1/chat", b"x=1"),
        (b"HTTPS://example.com:8443/a/b", b"/a/b", b""),
        (b"ws://example.com", b"/", b""),
        (b"http://example.com?x=1", b"/", b"x=1"),
    ],
    ids=[
        "root",
        "path only",
        "query kept as sent",
        "empty query",
        "second ? belongs to the query",
        "dots in the query are not touched",
        "fragment dropped",
        "encoded ? stays in the path",
        "absolute form",
        "absolute form, upper-case scheme, port",
        "absolute form without a path",
        "absolute form with query but no path",
    ],
)
def test_split_uri_separates_path_and_query(uri, path, query):
    """The request-target splits into the path to route and the query to pass on."""
    assert split_uri(uri) == (path, query)


@pytest.mark.parametrize("uri", [b"*", b"v1/chat", b"", b"ftp://example.com/a", b"?x=1"])
def test_split_uri_refuses_a_target_that_is_not_a_path(uri):
    """``OPTIONS *``, relative paths and foreign schemes are 400s."""
    with pytest.raises(BadPath) as error:
        split_uri(uri)
    assert error.value.status == 400


# -- normalize_path ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        (b"/", b"/"),
        (b"/v1/chat/ws", b"/v1/chat/ws"),
        # dot segments (RFC 3986 5.2.4)
        (b"/a/./b", b"/a/b"),
        (b"/a/../b", b"/b"),
        (b"/a/b/../c", b"/a/c"),
        (b"/a/b/../../c", b"/c"),
        (b"/a/b/..", b"/a/"),
        (b"/a/b/.", b"/a/b/"),
        (b"/a/..", b"/"),
        (b"/.", b"/"),
        (b"/./a", b"/a"),
        (b"/v1/chat/./x/../ws", b"/v1/chat/ws"),
        # percent-encoded dot segments, either case
        (b"/a/%2e%2e/b", b"/b"),
        (b"/a/%2E%2E/b", b"/b"),
        (b"/a/%2e%2E/b", b"/b"),
        (b"/a/.%2e/b", b"/b"),
        (b"/a/%2E./b", b"/b"),
        (b"/a/%2e/b", b"/a/b"),
        (b"/a/%2E/b", b"/a/b"),
        (b"/v1/admin/%2e%2e/chat/ws", b"/v1/chat/ws"),
        # names that only look like dots stay
        (b"/a/.../b", b"/a/.../b"),
        (b"/a/..b/c", b"/a/..b/c"),
        (b"/a/.hidden", b"/a/.hidden"),
        (b"/a/%2e%2e%2e", b"/a/..."),
        (b"/a/%252e%252e/b", b"/a/%252e%252e/b"),
        # empty segments
        (b"//a", b"/a"),
        (b"/a//b", b"/a/b"),
        (b"/a///b//", b"/a/b/"),
        (b"//", b"/"),
        # trailing slash kept
        (b"/a/", b"/a/"),
        (b"/v1/chat/", b"/v1/chat/"),
        # other encodings untouched
        (b"/a%2Fb", b"/a%2Fb"),
        (b"/a%2fb/c", b"/a%2fb/c"),
        (b"/caf%C3%A9", b"/caf%C3%A9"),
        (b"/a%20b", b"/a%20b"),
    ],
)
def test_normalize_path(path, expected):
    """Dot segments (also %2e forms) are resolved, // collapsed, other encodings kept."""
    assert normalize_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        b"/..",
        b"/../etc",
        b"/a/../..",
        b"/a/../../etc/passwd",
        b"/%2e%2e/etc",
        b"/%2E%2E",
        b"/a/%2e%2e/%2e%2e/b",
        b"/.%2e/x",
        b"//../x",
        b"/./../x",
    ],
)
def test_a_path_climbing_above_root_is_400(path):
    """Any spelling of a path above ``/`` is refused with 400, not clamped to ``/``."""
    with pytest.raises(BadPath) as error:
        normalize_path(path)
    assert isinstance(error.value, GatewayError)
    assert error.value.status == 400
    assert error.value.error == "bad_request"


@pytest.mark.parametrize("path", [b"", b"a/b", b"/a\x00b"])
def test_a_path_that_cannot_be_routed_is_400(path):
    """A relative path or a NUL byte is refused with 400."""
    with pytest.raises(BadPath) as error:
        normalize_path(path)
    assert error.value.status == 400


@pytest.mark.parametrize("path", [b"/", b"/a/b", b"/a/", b"/a%2Fb", b"/x/%2e%2e%2e"])
def test_normalising_twice_changes_nothing(path):
    """The normalised path is a fixed point: what was routed is what is sent."""
    once = normalize_path(path)
    assert normalize_path(once) == once


# -- prefixes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, path, matches",
    [
        (b"/v1/chat", b"/v1/chat", True),
        (b"/v1/chat", b"/v1/chat/", True),
        (b"/v1/chat", b"/v1/chat/ws", True),
        (b"/v1/chat", b"/v1/chatroom", False),
        (b"/v1/chat", b"/v1/chat.json", False),
        (b"/v1/chat", b"/v1/cha", False),
        (b"/v1/chat", b"/v1", False),
        (b"/v1/chat", b"/v2/chat", False),
        (b"/v1/chat", b"/V1/chat", False),
        (b"/", b"/", True),
        (b"/", b"/anything/at/all", True),
    ],
)
def test_prefixes_match_on_segment_boundaries(prefix, path, matches):
    """``/v1/chat`` serves ``/v1/chat`` and below, never ``/v1/chatroom``."""
    assert prefix_matches(prefix, path) is matches


ROUTES = RouteTable(
    [
        ("/v1", "v1"),
        ("/", "root"),
        ("/v1/chat/admin", "admin"),
        ("/v1/chat", "chat"),
    ]
)


@pytest.mark.parametrize(
    "path, route",
    [
        (b"/v1/chat/ws", "chat"),
        (b"/v1/chat", "chat"),
        (b"/v1/chat/admin", "admin"),
        (b"/v1/chat/admin/users", "admin"),
        (b"/v1/chat/administrator", "chat"),
        (b"/v1/chatroom", "v1"),
        (b"/v1", "v1"),
        (b"/v10", "root"),
        (b"/healthz", "root"),
        (b"/", "root"),
    ],
)
def test_the_longest_matching_prefix_wins(path, route):
    """Whatever the order in the file, the most specific route serves the path."""
    assert ROUTES.match(path) == route


def test_no_matching_prefix_is_no_route():
    """Without a ``/`` route, an unknown path matches nothing (the gateway answers 404)."""
    table = RouteTable([("/v1/chat", "chat"), ("/v2", "v2")])
    assert table.match(b"/v1/chatroom") is None
    assert table.match(b"/") is None
    assert table.match(b"/v2x") is None
    assert RouteTable([]).match(b"/") is None


@pytest.mark.parametrize(
    "prefix, expected",
    [
        ("/", "/"),
        ("/v1/chat", "/v1/chat"),
        ("/v1/chat/", "/v1/chat"),
        ("/v1/chat//", "/v1/chat"),
        ("/a%2Fb", "/a%2Fb"),
    ],
)
def test_validate_prefix_accepts_and_drops_the_trailing_slash(prefix, expected):
    """A configured prefix is a normalised path; a trailing ``/`` is not significant."""
    assert validate_prefix(prefix) == expected


@pytest.mark.parametrize(
    "prefix, reason",
    [
        ("v1/chat", "must start with '/'"),
        ("", "must start with '/'"),
        ("http://h/v1", "must start with '/'"),
        ("/v1?x=1", "without query or fragment"),
        ("/v1#top", "without query or fragment"),
        ("/v1/../admin", "normalised"),
        ("/v1/./chat", "normalised"),
        ("/v1/%2e%2e/admin", "normalised"),
        ("//v1", "normalised"),
        ("/v1//chat", "normalised"),
        ("/..", "climbs above"),
        ("/v1/../..", "climbs above"),
    ],
)
def test_validate_prefix_refuses_with_a_reason(prefix, reason):
    """A prefix that could never match a normalised path is refused, saying why."""
    with pytest.raises(ValueError) as error:
        validate_prefix(prefix)
    assert reason in str(error.value)
    assert repr(prefix) in str(error.value)


# -- upstream_url ------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, path, query, websocket, expected",
    [
        ("http://10.0.0.5:9001", b"/v1/chat/ws", b"room=a", True, "ws://10.0.0.5:9001/v1/chat/ws?room=a"),
        ("https://chat.example", b"/v1/chat/ws", b"", True, "wss://chat.example/v1/chat/ws"),
        ("http://10.0.0.5:9001", b"/v1/chat/rooms", b"", False, "http://10.0.0.5:9001/v1/chat/rooms"),
        ("https://chat.example", b"/v1/chat/rooms", b"a=1", False, "https://chat.example/v1/chat/rooms?a=1"),
        ("http://h/base", b"/v1/chat/ws", b"", True, "ws://h/base/v1/chat/ws"),
        ("http://h/base/", b"/v1/chat/ws", b"", False, "http://h/base/v1/chat/ws"),
        ("http://h", b"/", b"", False, "http://h/"),
        ("http://h", b"/a", b"x=1&x=2&token=t%20u", True, "ws://h/a?x=1&x=2&token=t%20u"),
        ("http://h", b"/a", b"next=/b/../c", False, "http://h/a?next=/b/../c"),
        ("http://h", b"/a%2Fb", b"", False, "http://h/a%2Fb"),
        ("http://h", b"/caf\xc3\xa9", b"", False, "http://h/caf%C3%A9"),
        ("http://h", b"/a b", b"", False, "http://h/a%20b"),
        ("http://h", b"/a", b"q=caf\xc3\xa9 x", True, "ws://h/a?q=caf%C3%A9%20x"),
        ("http://h", b"/a\x7f", b"\xff", False, "http://h/a%7F?%FF"),
        ("http://u:1", b"/a", b"q=%20&q=+&e=", False, "http://u:1/a?q=%20&q=+&e="),
        ("http://u:1/v1", b"/a/b", b"x=1", False, "http://u:1/v1/a/b?x=1"),
    ],
    ids=[
        "http becomes ws, query kept",
        "https becomes wss",
        "plain HTTP keeps http",
        "plain HTTPS keeps https",
        "base path kept",
        "base path trailing slash not doubled",
        "root",
        "query passed through as sent",
        "dots in query untouched",
        "encoded slash stays encoded",
        "raw UTF-8 in path is percent-encoded",
        "space in path is percent-encoded",
        "raw bytes in query are percent-encoded",
        "control and high bytes are percent-encoded",
        "escapes and form encoding in the query untouched",
        "base path and query",
    ],
)
def test_upstream_url(base, path, query, websocket, expected):
    """Base URL + normalised path + original query; ws/wss for upgrades; ASCII only."""
    url = upstream_url(base, path, query, websocket=websocket)
    assert url == expected
    url.encode("ascii")


# -- escaped slashes: what an upstream that decodes first would serve ------------


@pytest.mark.parametrize(
    "path, decoded",
    [
        (b"/v1/public/a%2Fb", b"/v1/public/a/b"),
        (b"/v1/public/..%2fapi/secret", b"/v1/api/secret"),
        (b"/v1/public/..%5Capi/secret", b"/v1/api/secret"),
        (b"/v1/public/..\\api/secret", b"/v1/api/secret"),
        (b"/v1/public/..;/api/secret", b"/v1/api/secret"),
        (b"/v1/public/x;jsessionid=1/y", b"/v1/public/x/y"),
        (b"/v1/public/%2e%2e%2Fapi", b"/v1/api"),
        (b"/v1/public/plain", b"/v1/public/plain"),
    ],
)
def test_the_decoded_path_is_what_a_decoding_upstream_serves(path, decoded):
    assert decoded_path(path) == decoded


TABLE = RouteTable([("/v1/public", "public"), ("/v1/api", "api"), ("/", "root")])


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/public/..%2fapi/secret",
        b"/v1/public/..%2Fapi/secret",
        b"/v1/public/..%5capi/secret",
        b"/v1/public/..\\api/secret",
        b"/v1/public/..;/api/secret",
        b"/v1/public/%2e%2e%2fapi/secret",
        b"/v1%2Fapi/secret",
        b"/v1/public/..%2f..%2f..%2fetc/passwd",
    ],
)
def test_a_path_whose_decoded_form_changes_route_is_a_400_by_default(path):
    with pytest.raises(BadPath):
        check_escaped_path(path, TABLE.match(path), TABLE, "check")


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/public/a%2Fb",
        b"/v1/public/a%5Cb",
        b"/v1/public/x;v=1/y",
        b"/v1/public/a/..%2Fb",
        b"/v1/api/..%2Fapi/x",
        b"/v1/public/plain",
    ],
)
def test_a_path_whose_decoded_form_stays_in_its_route_passes_by_default(path):
    check_escaped_path(path, TABLE.match(path), TABLE, "check")


@pytest.mark.parametrize("path", [b"/v1/public/a%2Fb", b"/v1/public/a%5cb", b"/v1/public/a\\b"])
def test_reject_refuses_every_escaped_slash(path):
    with pytest.raises(BadPath):
        check_escaped_path(path, TABLE.match(path), TABLE, "reject")


def test_reject_still_passes_a_path_without_escaped_slashes():
    check_escaped_path(b"/v1/public/x;v=1/y", "public", TABLE, "reject")


def test_keep_forwards_even_a_path_that_changes_route():
    check_escaped_path(b"/v1/public/..%2fapi/secret", "public", TABLE, "keep")


# -- query fields ------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, expected",
    [
        (b"", []),
        (b"a=1&b=", [(b"a=1", b"a", b"1"), (b"b=", b"b", b"")]),
        (b"%74oken=a%2Eb+c", [(b"%74oken=a%2Eb+c", b"token", b"a.b c")]),
        (b"x&&y=%FF\xff", [(b"x", b"x", b""), (b"", b"", b""), (b"y=%FF\xff", b"y", b"\xff\xff")]),
        (b"a=b=c;d", [(b"a=b=c;d", b"a", b"b=c;d")]),
    ],
    ids=["empty", "fields in order", "form-decoded", "bare names, empty fields, raw bytes", "only & separates"],
)
def test_query_fields_keep_the_raw_field_and_form_decode_name_and_value(query, expected):
    assert list(query_fields(query)) == expected


@pytest.mark.parametrize(
    "query, expected",
    [
        (b"room=a&room=b", b"a"),
        (b"room=&room=b", b"b"),
        (b"ro%6Fm=a+b%20c", b"a b c"),
        (b"rooms=a&my_room=b&room", None),
        (b"", None),
    ],
)
def test_query_value_is_the_first_non_empty_field_of_that_name(query, expected):
    """The token parameter and the hash_key query field are read the same way."""
    assert query_value(query, "room") == expected
