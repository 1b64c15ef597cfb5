"""
A token the gateway verified before is not verified again until its ``exp``:
the cache of verified tokens (``[auth] token_cache``), alone and inside the
Authenticator.
"""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from twisted_gateway.auth import AuthError, Authenticator, AuthSettings, parse_auth_section
from twisted_gateway.config import ConfigError
from twisted_gateway.verified_tokens import VerifiedTokens

NOW = 1_700_000_000.0
SECRET = b"k" * 32

# -- the cache alone (pure) ------------------------------------------------------

# (operations, expected look-ups): put(token, expires, now) / get(token, now) -> value
CASES = [
    pytest.param([("put", "a", 10, 0)], [("a", 9, "v-a")], id="kept until its exp"),
    pytest.param([("put", "a", 10, 0)], [("a", 10, None)], id="never at or past its exp"),
    pytest.param([("put", "a", None, 0)], [("a", 0, None)], id="no exp: not kept"),
    pytest.param([("put", "a", 10, 10)], [("a", 5, None)], id="already expired: not kept"),
    pytest.param([("put", "a", 10, 0)], [("ab", 1, None), ("a", 1, "v-a")],
                 id="keyed by the whole token"),
    pytest.param([("put", "a", 10, 0), ("put", "b", 10, 0), ("put", "c", 10, 0)],
                 [("a", 1, None), ("b", 1, "v-b"), ("c", 1, "v-c")], id="oldest out at the size"),
    pytest.param([("put", "a", 10, 0), ("put", "b", 10, 0), ("get", "a", 1),
                  ("put", "c", 10, 0)],
                 [("a", 1, "v-a"), ("b", 1, None), ("c", 1, "v-c")],
                 id="least recently used out first"),
]


@pytest.mark.parametrize("operations, lookups", CASES)
def test_verified_tokens(operations, lookups) -> None:
    tokens: VerifiedTokens[str] = VerifiedTokens(2)
    for op, token, *args in operations:
        if op == "put":
            tokens.put(token, f"v-{token}", *args)
        else:
            tokens.get(token, *args)
    assert [tokens.get(token, now) for token, now, _ in lookups] == [v for *_, v in lookups]
    assert len(tokens) <= 2


def test_a_cache_of_size_zero_keeps_nothing() -> None:
    tokens: VerifiedTokens[str] = VerifiedTokens(0)
    tokens.put("a", "v", 10, 0)
    assert (tokens.get("a", 1), len(tokens)) == (None, 0)


# -- inside the Authenticator ----------------------------------------------------


def _verify(authenticator: Authenticator, token: str) -> Any:
    outcome: list[Any] = []
    Deferred.fromCoroutine(authenticator.verify(token)).addBoth(outcome.append)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The tokens PyJWT parses (once per verification)."""
    seen: list[str] = []
    decode = jwt.decode_complete

    def counting(token, *args, **kwargs):
        seen.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode_complete", counting)
    return seen


def _authenticator(clock: Clock, **settings: Any) -> Authenticator:
    return Authenticator(AuthSettings(algorithms=("HS256",), secret=SECRET, **settings), clock)


def _token(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", "exp": NOW + 60, **claims}, SECRET, algorithm="HS256")


def test_a_token_verified_before_is_not_checked_again_until_its_exp(decodes) -> None:
    """The same token again gives the same identity without a signature check, until exp."""
    clock = Clock()
    clock.advance(NOW)
    authenticator = _authenticator(clock)
    token = _token()
    first = _verify(authenticator, token)
    clock.advance(59)
    assert _verify(authenticator, token) is first
    assert decodes == [token]
    clock.advance(1)  # at exp: checked again (accepted within the leeway)
    assert _verify(authenticator, token).subject == "alice"
    assert decodes == [token, token]
    clock.advance(30)  # exp + leeway
    with pytest.raises(AuthError, match="token expired"):
        _verify(authenticator, token)


def test_a_token_differing_from_a_verified_one_is_verified_afresh(decodes) -> None:
    clock = Clock()
    clock.advance(NOW)
    authenticator = _authenticator(clock)
    token = _token()
    _verify(authenticator, token)
    header, claims, signature = token.split(".")
    forged = ".".join((header, claims, signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")))
    with pytest.raises(AuthError):
        _verify(authenticator, forged)
    assert decodes == [token, forged]


def test_refused_tokens_and_tokens_without_exp_are_not_kept(decodes) -> None:
    clock = Clock()
    clock.advance(NOW)
    authenticator = _authenticator(clock, require=())
    endless = jwt.encode({"sub": "bob"}, SECRET, algorithm="HS256")
    early = _token(nbf=NOW + 45)
    for token in (endless, endless):
        assert _verify(authenticator, token).subject == "bob"
    for _ in range(2):
        with pytest.raises(AuthError, match="nbf"):
            _verify(authenticator, early)
    assert decodes == [endless, endless, early, early]


def test_token_cache_zero_verifies_every_time(decodes) -> None:
    clock = Clock()
    clock.advance(NOW)
    authenticator = _authenticator(clock, token_cache=0)
    token = _token()
    _verify(authenticator, token)
    _verify(authenticator, token)
    assert decodes == [token, token]


def test_token_cache_is_read_from_the_auth_section() -> None:
    values = {"algorithms": "HS256", "secret": SECRET.decode()}
    assert parse_auth_section("tap.cfg", values).token_cache == 4096
    assert parse_auth_section("tap.cfg", {**values, "token_cache": "0"}).token_cache == 0
    with pytest.raises(ConfigError) as caught:
        parse_auth_section("tap.cfg", {**values, "token_cache": "-1"})
    assert (caught.value.section, caught.value.key) == ("auth", "token_cache")
    assert ">= 0" in caught.value.reason
