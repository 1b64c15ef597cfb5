"""
The config schema is declared once and parsed purely: the settings classes
carry every key's parser and default, parsing reads no file and no
environment variable, and loading reads them with the same one-line errors.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from twisted_gateway.auth import Authenticator
from twisted_gateway.config import ConfigError, load_settings, parse_config
from twisted_gateway.schema import SECTIONS, RouteSettings, read_section, section_keys

PACKAGE = Path(__file__).resolve().parent.parent / "twisted_gateway"

ROUTE = "[route:chat]\nprefix = /v1/chat\nupstream = http://127.0.0.1:9001\n"


def _imports(path: Path) -> set[str]:
    """The package's modules a module imports: at the top, inside functions, or for the type checker."""
    found = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted_gateway."):
            found.add(node.module.split(".")[1])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found - {path.stem}


def test_the_schema_imports_nothing_of_the_package():
    """Every module can import the schema."""
    assert _imports(PACKAGE / "schema.py") == set()


def test_no_module_of_the_package_imports_itself_back():
    """No import cycle, counting the imports made inside functions and those for the type checker."""
    graph = {path.stem: _imports(path) for path in PACKAGE.glob("*.py")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for module in graph.get(start, ()):
            if module == goal or (module not in seen and reaches(module, goal, seen | {module})):
                return True
        return False

    assert [module for module in graph if reaches(module, module, {module})] == []


def test_every_section_declares_each_key_once_with_its_parser():
    """A key's default is its field's default: a settings class made in code has the file's defaults."""
    for settings_type in (*SECTIONS.values(), RouteSettings):
        keys = section_keys(settings_type)
        assert keys, settings_type
        for name, spec in keys.items():
            assert callable(spec.metadata["parse"]), (settings_type, name)
    values = {"prefix": "/a", "upstream": "http://h"}
    route = RouteSettings(name="chat", **read_section("f", "route:chat", values, RouteSettings))
    assert route == RouteSettings("chat", "/a", ("http://h",))
    assert [f.name for f in dataclasses.fields(RouteSettings) if f.default is dataclasses.MISSING] == [
        "name",
        "prefix",
        "upstream",
    ]


#: (config text pointing at something missing, the section and key that name it)
POINTING = [
    ("[admin]\ntoken = env:T14_UNSET\n" + ROUTE, "admin", "token"),
    ("[auth]\nalgorithms = HS256\nsecret = file:{missing}\n" + ROUTE, "auth", "secret"),
    ("[auth]\nalgorithms = RS256\npublic_key = file:{missing}\n" + ROUTE, "auth", "public_key"),
    ("[auth]\nalgorithms = RS256\njwks_file = file:{missing}\n" + ROUTE, "auth", "jwks_file"),
    ("[auth]\nalgorithms = RS256\njwks_url = https://i.test/k\nca_file = {missing}\n" + ROUTE, "auth",
     "ca_file"),
    ("[cluster]\nredis = env:T14_UNSET\n" + ROUTE, "cluster", "redis"),
    ("[cluster]\nredis = rediss://redis.test\nca_file = {missing}\n" + ROUTE, "cluster", "ca_file"),
    ("[gateway]\nlisten = ssl:8443:privateKey={missing}\n" + ROUTE, "gateway", "listen"),
    ("[gateway]\naccess_log = {missing}/a.log\n" + ROUTE, "gateway", "access_log"),
    ("[admin]\nlisten = ssl:8443:privateKey={missing}\n" + ROUTE, "admin", "listen"),
    ("[demo]\nchat_service = ssl:9001:privateKey={missing}\n" + ROUTE, "demo", "chat_service"),
    (ROUTE + "ca_file = {missing}\n", "route:chat", "ca_file"),
    (ROUTE + "client_cert = {missing}\n", "route:chat", "client_cert"),
]


@pytest.mark.parametrize("text, section, key", POINTING, ids=[f"{s} {k}" for _, s, k in POINTING])
def test_parsing_reads_nothing_and_loading_names_what_is_missing(tmp_path, monkeypatch, text, section, key):
    """A missing file or variable does not stop parsing; loading stops with one line naming the key."""
    monkeypatch.delenv("T14_UNSET", raising=False)
    settings = parse_config(text.format(missing=tmp_path / "missing"), source="gw.cfg")
    with pytest.raises(ConfigError) as caught:
        load_settings(settings)
    assert (caught.value.source, caught.value.section, caught.value.key) == ("gw.cfg", section, key)
    assert "\n" not in str(caught.value)


def test_an_authenticator_refuses_settings_whose_secret_is_not_loaded(monkeypatch):
    """Parsed settings naming an env: secret are loaded before use, else no token could verify."""
    monkeypatch.setenv("T14_SECRET", "0123456789abcdef0123456789abcdef")
    settings = parse_config("[auth]\nalgorithms = HS256\nsecret = env:T14_SECRET\n" + ROUTE)
    with pytest.raises(ValueError, match=r"\[auth\] secret is not loaded yet"):
        Authenticator(settings.auth, Clock())
    loaded = load_settings(settings).auth
    assert Authenticator(loaded, Clock()).settings.secret == b"0123456789abcdef0123456789abcdef"


def test_a_secret_written_in_the_file_needs_no_loading():
    """Parsing takes a literal secret as it stands: settings made from text alone can verify tokens."""
    settings = parse_config("[auth]\nalgorithms = HS256\nsecret = 0123456789abcdef0123456789abcdef\n" + ROUTE)
    assert settings.auth is not None and settings.auth.secret == b"0123456789abcdef0123456789abcdef"
    assert load_settings(settings) == settings
