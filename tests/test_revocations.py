"""Revoked tokens in memory: which claims a revocation covers."""

from __future__ import annotations

import pytest

from twisted_gateway.revocations import Revocations, matches


def _state() -> Revocations:
    state = Revocations()
    state.add_jti("stolen", until=2000)
    state.add_subject("alice", before=1000)
    return state


@pytest.mark.parametrize(
    "claims, revoked",
    [
        ({"sub": "bob", "jti": "stolen", "iat": 1500}, "jti"),
        ({"sub": "bob", "jti": "other", "iat": 1500}, None),
        ({"sub": "alice", "iat": 999}, "sub"),
        ({"sub": "alice", "iat": 1000}, None),  # issued at the revocation time: new enough
        ({"sub": "alice", "iat": 1500.5}, None),
        ({"sub": "alice"}, "sub"),  # no iat: cannot prove it is newer
        ({"sub": "alice", "iat": True}, "sub"),
        ({"sub": "carol", "iat": 1}, None),
        ({}, None),
        ({"jti": 7, "sub": 8}, None),
    ],
)
def test_revoked_claims(claims, revoked):
    assert _state().revoked(claims) == revoked


def test_a_later_revocation_of_a_subject_extends_it_and_an_earlier_one_does_not_shrink_it():
    state = _state()
    state.add_subject("alice", before=500)
    assert state.subjects["alice"] == 1000
    state.add_subject("alice", before=3000)
    assert state.revoked({"sub": "alice", "iat": 2000})


def test_expired_jtis_are_forgotten_and_loaded_state_merges_with_what_arrived_meanwhile():
    state = _state()
    state.prune(now=2000)
    assert state.jtis == {}
    loaded = Revocations({"a": 5000.0}, {"bob": 10.0})
    state.replace(loaded)
    assert (state.jtis, state.subjects) == ({"a": 5000.0}, {"alice": 1000.0, "bob": 10.0})


@pytest.mark.parametrize(
    "claims, kwargs, hit",
    [
        ({"jti": "x", "sub": "a"}, {"jti": "x"}, True),
        ({"jti": "y", "sub": "a"}, {"jti": "x"}, False),
        ({"sub": "a", "iat": 5}, {"sub": "a", "before": 10}, True),
        ({"sub": "a", "iat": 15}, {"sub": "a", "before": 10}, False),
        ({"sub": "a", "iat": 15}, {"sub": "a"}, True),  # an administrator's disconnect
        ({"sub": "b", "iat": 5}, {"sub": "a", "before": 10}, False),
    ],
)
def test_one_revocation_matches_the_sockets_it_covers(claims, kwargs, hit):
    assert matches(claims, **kwargs) is hit
